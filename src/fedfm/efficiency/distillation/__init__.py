"""Knowledge distillation on the server's public data: FedDF (ensemble distillation into the
global model) and FedMKT (mutual transfer between a server-side large model and the clients'
small one). Importing registers both algorithms."""

from fedfm.efficiency.distillation import feddf, fedmkt  # noqa: F401
from fedfm.efficiency.distillation.check import check_distillation

__all__ = ["check_distillation"]
