"""Privacy attacks as evaluation tools: membership inference, canary exposure, token recovery
(``fedfm attack privacy RUN_DIR``). Importing this package registers them."""

from fedfm.core.registries import ATTACKS
from fedfm.core.registry import MethodInfo
from fedfm.trust.attacks.canaries import exposure
from fedfm.trust.attacks.membership import membership_inference
from fedfm.trust.attacks.token_recovery import recover_tokens

ATTACKS.register("membership_inference", MethodInfo(
    "trust.privacy.attacks",
    "Privacy Risk in Machine Learning (Yeom et al., CSF 2018); On the Importance of Difficulty "
    "Calibration in Membership Inference Attacks (Watson et al., ICLR 2022)",
    "eval: {enabled: true}  # then: fedfm attack privacy RUN_DIR",
    "loss-threshold and reference-calibrated membership inference: AUC, TPR at 1% FPR"),
)(membership_inference)
ATTACKS.register("canary_exposure", MethodInfo(
    "trust.privacy.attacks",
    "The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural Networks "
    "(Carlini et al., USENIX Security 2019)",
    "eval: {canaries: {client: 0, count: 4, repeats: 8}}  # then: fedfm attack privacy RUN_DIR",
    "planted random secrets: exposure, extraction rank, greedy extraction"),
)(exposure)
ATTACKS.register("token_recovery", MethodInfo(
    "trust.privacy.attacks",
    "Deep Leakage from Gradients (Zhu et al., NeurIPS 2019); DAGER: Exact Gradient Inversion "
    "for Large Language Models (Petrov et al., NeurIPS 2024)",
    "adapter: {kind: lora}  # then: fedfm attack privacy RUN_DIR",
    "the tokens of a client's batches, read off its embedding, LoRA-embedding or first-layer "
    "update"),
)(recover_tokens)
