"""Adapters on disk: our own layout (`native`: safetensors + a JSON spec) and Hugging Face
peft's (`hf_peft`: loadable with `PeftModel.from_pretrained`); `detect` tells which a folder
holds. The two layouts never import each other."""
