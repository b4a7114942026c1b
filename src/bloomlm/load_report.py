"""What `from_pretrained` says about the weights it loads, in both frameworks, framework-free.

transformers 4.37's warnings, with its text and through `logging` as it does: weights a model has
that the checkpoint lacks ("newly initialized ... You should probably TRAIN this model"), weights
re-initialised because their shapes differ (with `ignore_mismatched_sizes=True`), and checkpoint
weights the model does not use. PyTorch warns about unused weights when the model's class is the
one the checkpoint was saved from (another class: logged at INFO), Flax always; bloomlm follows
each.

Stricter than transformers, which only warns: a missing weight the model needs is an error naming
it. Only a task head may be missing (its first name part is `lm_head`, `score`, `classifier` or
`qa_outputs`): loading a checkpoint of another task gives a new head, initialised and reported.
Anything else missing means the checkpoint does not describe the model (a config.json of another
shape, incomplete files), and random weights would answer in silence. A tied `lm_head.weight` is the
embedding matrix and never missing; callers leave it out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from bloomlm.checkpoint_names import HEAD_MODULE_NAMES
from bloomlm.errors import CheckpointError

logger = logging.getLogger(__name__)

_SHOWN = 10  # names listed in an error; the count says how many more


def is_head_weight(name: str, sep: str = ".") -> bool:
    """Whether `name` (as the model spells it) belongs to a task head, not to the BLOOM trunk."""
    return name.split(sep, 1)[0] in HEAD_MODULE_NAMES


def check_needed_weights(
    missing: Sequence[str], model_name: str, source: str, sep: str = "."
) -> None:
    """CheckpointError naming the weights in `missing` that are not a task head's."""
    needed = [name for name in missing if not is_head_weight(name, sep)]
    if not needed:
        return
    shown = ", ".join(needed[:_SHOWN]) + (
        f" and {len(needed) - _SHOWN} more" if len(needed) > _SHOWN else ""
    )
    raise CheckpointError(
        f"the checkpoint at {source} lacks {len(needed)} weight(s) that {model_name} needs: "
        f"{shown}. Its weights and its config.json describe different models, or files are "
        "missing; only a task head's weights (lm_head, score, classifier, qa_outputs) may be "
        "absent, and are then initialised"
    )


def report_loading(
    model_name: str,
    source: str,
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[tuple[str, tuple, tuple]],
    warn_unexpected: bool = True,
) -> None:
    """Log transformers' messages about newly initialised and unused weights."""
    if unexpected:
        log = logger.warning if warn_unexpected else logger.info
        log(
            f"Some weights of the model checkpoint at {source} were not used when initializing "
            f"{model_name}: {list(unexpected)}\n- This IS expected if you are initializing "
            f"{model_name} from the checkpoint of a model trained on another task or with another "
            "architecture (e.g. initializing a BertForSequenceClassification model from a "
            "BertForPreTraining model).\n- This IS NOT expected if you are initializing "
            f"{model_name} from the checkpoint of a model that you expect to be exactly identical "
            "(initializing a BertForSequenceClassification model from a "
            "BertForSequenceClassification model)."
        )
    if missing:
        logger.warning(
            f"Some weights of {model_name} were not initialized from the model checkpoint at "
            f"{source} and are newly initialized: {list(missing)}\nYou should probably TRAIN "
            "this model on a down-stream task to be able to use it for predictions and inference."
        )
    if mismatched:
        lines = "\n".join(
            f"- {key}: found shape {found} in the checkpoint and {wanted} in the model instantiated"
            for key, found, wanted in mismatched
        )
        logger.warning(
            f"Some weights of {model_name} were not initialized from the model checkpoint at "
            f"{source} and are newly initialized because the shapes did not match:\n{lines}\n"
            "You should probably TRAIN this model on a down-stream task to be able to use it for "
            "predictions and inference."
        )
