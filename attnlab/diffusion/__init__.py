"""attnlab.diffusion"""
