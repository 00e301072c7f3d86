"""Trainmon's step events in TensorBoard event files: the tags (`tags`), writing (`encode`) and
reading (`decode`)."""

from monitor.runlog.events.decode import ParamNorms, StepDecoder, decode_records
from monitor.runlog.events.encode import EventWriter, encode_step, event_file_name, record_values, step_vector

__all__ = ["EventWriter", "ParamNorms", "StepDecoder", "decode_records", "encode_step", "event_file_name",
           "record_values", "step_vector"]
