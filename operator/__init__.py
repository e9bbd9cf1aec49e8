"""deepseek-operator: serve DeepSeek models on Triton Inference Server from a Kubernetes custom resource."""

__version__ = "0.1.0"
