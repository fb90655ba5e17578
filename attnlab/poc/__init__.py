"""attnlab.poc"""
