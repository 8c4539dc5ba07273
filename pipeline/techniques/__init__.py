"""The training techniques of the 2022-25 Kaggle NLP winners, each one module and one config key.

AWP and FGM (adversarial.py) perturb and rerun after the backward pass; EMA and SWA (averaging.py) keep
averaged weights that evaluations and the checkpoint use; freezing (freeze.py) and LoRA adapters (lora.py) are
applied when the model is built. Each enters `train_fold` only through the points of `Technique` (base.py).
"""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.techniques.adversarial import AWP, FGM
from pipeline.techniques.averaging import EMA, SWA
from pipeline.techniques.base import Technique, Techniques

__all__ = ["AWP", "EMA", "FGM", "SWA", "Technique", "Techniques", "build"]


def build(t: TrainConfig, model, total_steps: int, steps_per_epoch: float) -> Techniques:
    """The techniques a config switches on, in the order they act at each point; `model` is the TextModel."""
    techniques = Techniques()
    if t.fgm > 0:
        techniques.append(FGM(t.fgm))
    if t.awp > 0:
        techniques.append(AWP(t.awp, t.awp_eps, start_step=round(t.awp_start * steps_per_epoch)))
    if t.ema > 0:
        ema = EMA(t.ema)
        ema.start(model)
        techniques.append(ema)
    if t.swa > 0:
        techniques.append(SWA(start_step=round(t.swa * total_steps)))
    return techniques
