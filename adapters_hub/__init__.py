"""lomix.hub: pull and push PEFT LoRAs and lomix mixtures (Hugging Face Hub or local folders).

    import lomix.hub

    pulled = lomix.hub.pull("user/repo@v1", out="mixture/")     # validated files, copied atomically
    model = lomix.hub.load(base_model, "user/repo@v1")          # a lomix mixture, into a model
    model = lomix.hub.load_peft_experts(base_model, ["user/a-lora", "user/b-lora"])  # PEFT LoRAs as experts
    lomix.hub.push("runs/my-run", "user/my-mixture", private=True)  # mixture + config + model card

This package lives in the repository folder ``adapters_hub/`` and is installed as ``lomix.hub``.
It may import ``lomix`` and huggingface_hub; the library never imports it.
"""

from . import errors
from .card import model_card
from .library import pull_library
from .peft_experts import load_peft_experts
from .pull import Pulled, load, pull
from .push import PushPlan, PushResult, plan_push, push
from .spec import Spec, parse_spec
from .validate import MixtureInfo, PeftAdapter, inspect

__all__ = [
    "MixtureInfo",
    "PeftAdapter",
    "Pulled",
    "PushPlan",
    "PushResult",
    "Spec",
    "errors",
    "inspect",
    "load",
    "load_peft_experts",
    "model_card",
    "parse_spec",
    "plan_push",
    "pull",
    "pull_library",
    "push",
]
