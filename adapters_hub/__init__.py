"""lomix.hub: pull and push PEFT LoRAs and lomix mixtures (Hugging Face Hub or local folders).

This package lives in the repository folder ``adapters_hub/`` and is installed as ``lomix.hub``.
It may import ``lomix`` and huggingface_hub; the library never imports it.
"""
