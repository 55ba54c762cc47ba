"""Telling the agent's audio encoding from its bytes: mu-law or 16-bit PCM (pure).

The client cannot choose the agent's output format (it is the agent's configuration), and the
gateway is told it by CARTESIA_OUTPUT_FORMAT or by the agent's `ack`. When the two disagree
the caller hears loud noise. Speech is low-pass: read as the right encoding, its samples change
little from one to the next; read as the wrong one, they look like noise. Comparing the two
readings of the first audible audio tells which encoding it is.
"""

from __future__ import annotations

import numpy as np

from gateway.audio import ulaw_to_pcm16

# How much audible audio the verdict waits for (mu-law 8 kHz bytes, or PCM bytes): 200 ms of
# speech averages over fricatives, whose high-frequency energy alone could look rough.
SNIFF_BYTES = 1600
# Roughness (energy of the sample-to-sample difference over the signal's own AC energy): white
# noise is 2.0, a 1 kHz tone at 8 kHz 0.6, voiced speech well under 0.5. A verdict needs one
# reading smooth and the other at least RATIO times rougher (measured: speech-like audio read
# the wrong way is 8 to 90 times rougher).
SMOOTH = 0.6
RATIO = 4.0
# Below this AC level (relative to full scale) the audio is silence, and tells nothing.
MIN_RMS = 100.0


def _roughness(samples: np.ndarray) -> float | None:
    centred = samples - samples.mean()
    energy = float(np.mean(centred * centred))
    if energy < MIN_RMS * MIN_RMS:
        return None
    step = np.diff(centred)
    return float(np.mean(step * step)) / energy


def roughness_as(audio: bytes) -> tuple[float | None, float | None]:
    """(roughness read as mu-law, roughness read as little-endian PCM16); None: silent."""
    as_mulaw = np.frombuffer(ulaw_to_pcm16(audio), dtype="<i2").astype(np.float64)
    as_pcm = np.frombuffer(audio[: len(audio) // 2 * 2], dtype="<i2").astype(np.float64)
    return _roughness(as_mulaw), _roughness(as_pcm)


def looks_like(audio: bytes) -> str | None:
    """ "mulaw" or "pcm" when `audio` clearly is that encoding; None when it cannot tell."""
    mulaw, pcm = roughness_as(audio)
    if mulaw is not None and mulaw < SMOOTH and (pcm is None or pcm > RATIO * mulaw):
        return "mulaw"
    if pcm is not None and pcm < SMOOTH and (mulaw is None or mulaw > RATIO * pcm):
        return "pcm"
    return None
