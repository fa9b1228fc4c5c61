"""hwloop: hardware-in-the-loop training of time-to-first-spike (TTFS) neuromorphic chips.

Science: Stanojevic et al., "High-performance deep spiking neural networks with 0.3 spikes per
neuron", Nature Communications 15, 6793 (2024).
"""

__version__ = "0.1.0"

from hwloop.ttfs import TTFSNetwork, convert  # noqa: E402

__all__ = ["TTFSNetwork", "convert", "__version__"]
