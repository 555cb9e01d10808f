"""LatentWire sweep: which transformation of input embeddings keeps a frozen LLM answering?"""

__version__ = "0.1.0"
