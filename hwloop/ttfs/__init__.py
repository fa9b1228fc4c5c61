"""The B1 / alpha1 TTFS math: coding, spiking layers, network, conversion, gradients.

Free of I/O. Time is in units of tau_c; a silent neuron's spike time is ``+inf``.
"""

from hwloop.ttfs.backward import apply_gradients, backward_from_spike_times, l1_penalty
from hwloop.ttfs.coding import check_pixels, decode, encode
from hwloop.ttfs.convert import convert
from hwloop.ttfs.layers import (ChannelShift, Flatten, NeuronLayer, Readout, SignedMaxPool2d,
                                SpikingConv2d, SpikingDense, SpikingMaxPool2d)
from hwloop.ttfs.network import GAMMA, TTFSNetwork

__all__ = [
    "GAMMA", "ChannelShift", "Flatten", "NeuronLayer", "Readout", "SignedMaxPool2d", "SpikingConv2d",
    "SpikingDense", "SpikingMaxPool2d", "TTFSNetwork", "apply_gradients", "backward_from_spike_times",
    "check_pixels", "convert", "l1_penalty", "decode", "encode",
]
