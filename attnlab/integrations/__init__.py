"""Second hosts for attnlab's training-free techniques (diffusers pipelines)."""
