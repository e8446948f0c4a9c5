"""Options of the sinkhorn router: the [model.ffn.router] table of a recipe. Torch-free (recipes validate without
torch); every field has a default and a description (`dsk components show router/sinkhorn` prints them)."""

from typing import Literal

from pydantic import Field

from dsk.api import BaseConfig


class SinkhornConfig(BaseConfig):
    """Top-k routing on a Sinkhorn-balanced assignment plan in training, gate weights from the raw scores."""

    # the MoE layer reads top_k (its slots per token) and checks top_k <= its routed experts
    top_k: int = Field(2, ge=1, description="routed experts per token")
    n_iters: int = Field(
        8, ge=0, le=1000, description="Sinkhorn-Knopp iterations (one row and one column scaling each; 0 = plain top-k)"
    )
    tau: float = Field(
        1.0, gt=0, description="temperature of the plan P = exp(logits / tau) (smaller: sharper, slower to balance)"
    )
    score_func: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="affinity function of the router logits, for the gate weights (and eval's top-k)"
    )
    normalize: bool = Field(True, description="renormalise the top_k gate weights of each token to sum to 1")
    route_scale: float = Field(1.0, gt=0, description="factor applied to the gate weights")
    balanced_eval: bool = Field(
        False,
        description="select on the balanced plan in eval too (false: on the raw scores; a one-token decoding step "
        "has nothing to balance against)",
    )
