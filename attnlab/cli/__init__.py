"""attnlab.cli"""
