"""The words a run is described in: sites, components, steering positions, lens fields and
dtypes. Plain data without torch, so configuration code can check values against it cheaply."""

from __future__ import annotations

# Where activations flow through one decoder layer, in order. Any can be captured; the residual
# stream and the inputs of attention and MLP can be steered. Where each sits in a family's layer
# is that family's row in actors/adapters.py.
SITES = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
COMPONENTS = SITES
STEERING_SITES = ("resid_pre", "resid_post", "attn_in", "mlp_in")
# Where an intervention (patch, ablate, scale, add) can act: every site but resid_mid, which the
# families read where the MLP's input norm reads it, after the layer has kept the residual it adds back
# (an edit there would reach the MLP's input only).
INTERVENTION_SITES = tuple(s for s in SITES if s != "resid_mid")
# Which positions an edit (or a capture) touches: every one, the prompt's, the generated ones,
# the last prompt token; an int i means every position >= i.
STEERING_POSITIONS = ("all", "prompt", "generated", "last")
# Lens fields and the value that marks "not captured" in each.
LENS_FIELDS = {
    "topk_ids": -1,
    "topk_logprobs": float("nan"),
    "entropy": float("nan"),
    "target_logprob": float("nan"),
    "target_rank": -1,
    "kl_to_final": float("nan"),
}
# Lenses a run can record: the logit lens (the plain arrays above), the tuned lens (the same
# fields, named `tuned_<field>`, from translated resid_post states; see actors/tuned_lens.py) and
# the Jacobian lens (`jacobian_<field>`, from J_l h; see actors/jacobian_lens.py).
LENSES = ("logit", "tuned", "jacobian")


def lens_array(field: str, lens: str = "logit") -> str:
    """The store array holding `field` of `lens`: `entropy` (logit), `tuned_entropy` (tuned), ..."""
    return field if lens == "logit" else f"{lens}_{field}"


def lens_fill(name: str):
    """The "not captured" value of any lens array (either lens), or None for other arrays."""
    for lens in LENSES[1:]:
        if name.startswith(lens + "_"):
            name = name[len(lens) + 1 :]
    return LENS_FIELDS.get(name)


MODEL_DTYPES = ("float32", "bfloat16", "float16")
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")  # bfloat16 is stored as its uint16 bits

# Ray placement-group strategies for a run's stage ranks (`cluster.placement`).
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
