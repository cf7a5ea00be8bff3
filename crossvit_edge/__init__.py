"""crossvit_edge: deploy CrossViT to TensorRT, Core ML and ExecuTorch, and measure what it cost."""
__version__ = "0.1.0"
