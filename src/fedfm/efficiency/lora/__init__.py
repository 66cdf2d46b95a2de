"""LoRA-aware aggregation and heterogeneous ranks: FedIT (the baseline, with its error
measured), FFA-LoRA, FLoRA, FlexLoRA, FedSA-LoRA and HetLoRA. Importing registers them."""

from fedfm.efficiency.lora import fedit, fedsa_lora, ffa_lora, flexlora, flora, hetlora  # noqa: F401

LORA_ALGORITHMS = ("fedit", "ffa_lora", "flora", "flexlora", "fedsa_lora", "hetlora")
# uploads whose shape is not the global State's (a rank slice, A only): the server pads them
SLICED_UPLOADS = ("flora", "flexlora", "fedsa_lora", "hetlora")
