"""The embedded ChatGLM-RLHF pipeline in miniature: a synthetic world, its stages and the report."""
