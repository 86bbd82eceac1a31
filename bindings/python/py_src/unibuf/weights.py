"""Weights: safetensors files loaded onto a device at line rate, and the streaming expert
cache for mixtures of experts."""

from __future__ import annotations

from . import _unibuf

_w = _unibuf.weights

WeightsFile = _w.WeightsFile
LoadedWeights = _w.LoadedWeights
Expert = _w.Expert
ExpertCache = _w.ExpertCache
load = _w.load

__all__ = ["WeightsFile", "LoadedWeights", "Expert", "ExpertCache", "load"]
