"""A loop that trains on forwards of the model in eval mode: model.train() not called after an evaluation.

Forwards in eval mode are evaluations, not part of a step, so such a loop's steps had no forwards: empty
records, and nothing said. An optimizer step after eval-mode forwards with autograd on, and no forward in
train mode, finds it out: said once (dropout is off, batch norm uses its running statistics, which the
user may not intend), and the collector counts eval-mode forwards as the steps' own from then on, until a
forward in train mode.
"""

from __future__ import annotations

import logging

log = logging.getLogger("trainmon")


class EvalModeTraining:
    __slots__ = ("forwards", "on", "said")

    def __init__(self) -> None:
        self.forwards = 0  # eval-mode forwards with autograd on since the last step
        self.on = False  # eval-mode forwards count as the steps' own
        self.said = False

    def step_end(self, micro: int) -> None:
        """An optimizer step ended after `micro` training forwards (called when `forwards` is not 0)."""
        if micro == 0 and not self.on:
            self.on = True
            if not self.said:
                self.said = True
                log.warning("trainmon: optimizer steps follow forwards of the model in eval mode (model.train() not "
                            "called after an evaluation?): dropout is off and batch norm uses its running "
                            "statistics. The monitor counts them as the steps' forwards from the next step on")
        self.forwards = 0
