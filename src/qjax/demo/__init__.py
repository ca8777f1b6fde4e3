"""End-to-end examples of qjax on real data: quantization-aware training of small models."""
