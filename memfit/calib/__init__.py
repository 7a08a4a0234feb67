"""Calibration: text sources and token windows (`data`), the statistics hooks accumulate
(`stats`), and the sequential layer-by-layer engine that feeds them (`engine`)."""

from memfit.calib.data import load_text, sentences, token_windows, tokenize, windows
from memfit.calib.engine import ActivationStore, capture_inputs, collect_stats, propagate
from memfit.calib.stats import HessianStat, InputNormStat

__all__ = ["ActivationStore", "HessianStat", "InputNormStat", "capture_inputs", "collect_stats",
           "load_text", "propagate", "sentences", "token_windows", "tokenize", "windows"]
