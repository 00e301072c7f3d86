"""The tags and vectors of trainmon's step events: the TensorBoard side of the run-directory format.

One Event per optimizer step. Its first value is the step vector (`STEP_VECTOR_TAG`, float64: a
presence mask, the present fields in `VECTOR_FIELDS` order, then the LRs); the second, on steps that
carry them, the per-parameter gradient norms (`PARAM_VECTOR_TAG`, float32 in run.json's
model.param_names order). Readers take every field from these vectors. Then come the same values as
`simple_value` scalars under `trainmon/...` tags for TensorBoard's charts, and last the extras a
vector does not hold (attention statistics, mon.log() scalars, sampled per-parameter scalars, rank
0's DDP comparison as JSON). The per-parameter and attention series have TensorBoard sections of
their own (`trainmon_param_grad_norm/`, `trainmon_attention/`: TensorBoard groups by the part before
the first slash); files of earlier versions hold them under `trainmon/`, which readers still accept.
"""

from __future__ import annotations

import struct

PREFIX = "trainmon/"
# StepRecord field -> tag, for the plain scalar fields.
FIELD_TAGS = {
    "loss": "trainmon/loss",
    "grad_norm": "trainmon/grad_norm",
    "grad_norm_clipped": "trainmon/grad_norm_clipped",
    "clip_coef": "trainmon/clip_coef",
    "max_norm": "trainmon/max_norm",
    "loss_scale": "trainmon/loss_scale",
    "skipped": "trainmon/skipped",
    "step_time": "trainmon/step_time",
    "tokens": "trainmon/tokens",
    "micro_batches": "trainmon/micro_batches",
    "scheduler_steps": "trainmon/scheduler_steps",
    "busy_time": "trainmon/busy_time",
    "local_grad_norm": "trainmon/local_grad_norm",
    "memory": "trainmon/memory_bytes",
    "grad_norm_unknown": "trainmon/grad_norm_unknown",
    "input_time": "trainmon/phase/input",
    "compute_time": "trainmon/phase/compute",
    "collective_wait_time": "trainmon/phase/collective_wait",
}
TAG_FIELDS = {v: k for k, v in FIELD_TAGS.items()}
AUTOCAST_TAG = "trainmon/autocast"
AUTOCAST_CODES = {"float16": 1.0, "bfloat16": 2.0}  # a scalar series, like everything else in the file
AUTOCAST_NAMES = {v: k for k, v in AUTOCAST_CODES.items()}
LR_PREFIX = "trainmon/lr/group"
LR_TAG = LR_PREFIX + "{}"
PARAM_TAG = "trainmon_param_grad_norm/"  # sampled scalar series, for TensorBoard's charts (a section of their own)
OLD_PARAM_TAG = "trainmon/param_grad_norm/"  # what earlier versions wrote: read, never written
PARAM_TAGS = (PARAM_TAG, OLD_PARAM_TAG)
# Every per-parameter norm of a step as one float32 vector in run.json's model.param_names order
# (-1: the parameter had no gradient), so readers see exactly what the in-process rules saw.
PARAM_VECTOR_TAG = "trainmon/param_grad_norms"
NO_GRAD = -1.0
NO_GRAD_BYTES = struct.pack("<f", NO_GRAD)
# Every field of a step as one float64 vector: exact, and what readers decode.
STEP_VECTOR_TAG = "trainmon/step"
VECTOR_FIELDS = ("loss", "grad_norm", "grad_norm_clipped", "clip_coef", "max_norm", "loss_scale", "skipped",
                 "step_time", "tokens", "micro_batches", "scheduler_steps", "autocast",
                 # bit positions are the file format: new fields go at the end
                 "busy_time", "local_grad_norm", "memory", "grad_norm_unknown",
                 "input_time", "compute_time", "collective_wait_time")  # bits 16-18 (HAS_MORE is bit 20)
BOOL_FIELDS = frozenset({"skipped", "grad_norm_unknown"})
WHEN_TRUE = frozenset({"grad_norm_unknown"})  # flags stored only when set (absent reads back as False)
DDP_TAG = "trainmon/ddp"  # rank 0's comparison of the ranks, JSON in a string tensor
HAS_MORE = 1 << 20  # attention statistics or extra scalars follow as scalar values
ATTENTION_TAG = "trainmon_attention/"  # trainmon_attention/<stat>/<layer> (a section of their own)
OLD_ATTENTION_TAG = "trainmon/attention/"  # what earlier versions wrote: read, never written
ATTENTION_TAGS = (ATTENTION_TAG, OLD_ATTENTION_TAG)
SCALAR_TAG = "trainmon/scalars/"
INT_FIELDS = {"tokens", "micro_batches", "scheduler_steps"}
EXTRA_PREFIXES = (*PARAM_TAGS, *ATTENTION_TAGS, SCALAR_TAG)  # scalar values read back besides the vectors
READ_PREFIXES = (PREFIX, PARAM_TAG, ATTENTION_TAG)  # the tags a reader of scalar-only events looks at


def f32_shortest(x: float) -> float:
    """The shortest decimal that is the same float32: stored LRs read back as 0.001, not 0.0010000000474974513."""
    packed = struct.pack("<f", x)
    for digits in (6, 7, 8):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == packed:
            return y
    return x


