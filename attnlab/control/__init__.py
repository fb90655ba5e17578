"""attnlab.control"""
