"""Phrase grounding from the cross-attention maps of a text-conditioned diffusion U-Net.

The modules are imported one by one, so that importing a light module (for example
`grounding.metrics`) does not load diffusers:

- `grounding.capture`: the attention processor that records head-averaged cross-attention
  probabilities, layer selection, and the install/restore context manager;
- `grounding.engine`: `GroundingConfig`, `SamplingMode` and `GroundingEngine`, which run the
  sampling modes and return one `AttentionSummary` per pair;
- `grounding.maps`: the streaming accumulator and the reductions to `P_comb`, the image and text
  biases and `P_mult`;
- `grounding.tokens`, `grounding.bbm`, `grounding.masks`, `grounding.metrics`,
  `grounding.aggregation`, `grounding.reporting`: token selection, Bimodal Bias Merging, binary
  masks, per-pair metrics, per-finding aggregation and result files.
"""
