"""Ground one phrase in one radiograph and write heat-map PNGs.

    python ground.py --image cxr.jpg --phrase "small left pleural effusion" --output effusion.png \\
        --ckpt_path runs/demo/checkpoints/last.ckpt -- --config configs/demo.yaml

Everything after ``--`` is read like ``train.py`` arguments (config files and overrides), so the
same config builds the model, and the grounding options come from its ``GroundingEvaluation``
callback (``--trainer.callbacks.init_args.num_inference_steps=50``, ...). Without
``--ckpt_path`` the U-Net comes from the config, for example a published fine-tuned U-Net set
with ``--model.unet_name_or_path``. The output shows the image, the main map and one map per
word token, like Figure 2 of Generate to Ground (MIDL 2025).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from callbacks.grounding_evaluation import GroundingEvaluation
from callbacks.overlays import render_word_maps
from datamodules.image_io import ImageDecodeError, read_grayscale
from datamodules.transforms import to_model_input
from grounding import maps
from grounding.engine import GroundingEngine, pair_seed_from_id
from grounding.masks import upsample_map
from grounding.tokens import TokenStrategy, select_tokens
from train import GroundingCLI, LatentDiffusionModule

log = logging.getLogger("ground")


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the command line into this script's options and the config arguments after ``--``."""
    if "--" in argv:
        split = argv.index("--")
        own, config_arguments = argv[:split], argv[split + 1 :]
    else:
        own, config_arguments = argv, []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="radiograph: JPEG, PNG (8 or 16 bit) or DICOM")
    parser.add_argument("--phrase", required=True, help="the phrase to ground")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint of a fine-tuned model")
    parser.add_argument("--image_size", type=int, default=None, help="model input side in pixels (default: data.init_args.image_size)")
    return parser.parse_args(own), config_arguments


def word_maps(summary: maps.AttentionSummary, phrase: str, encoded: object) -> list[tuple[str, np.ndarray]]:
    """Reduce the summary to one map per word token of the phrase, with the token's word."""
    selection = select_tokens(phrase, encoded.offsets[0], encoded.attention_mask[0].tolist(), TokenStrategy.ALL_WORDS)
    return [
        (word, maps.combined_map(summary, [position]).cpu().numpy())
        for position, word in zip(selection.positions, selection.words)
    ]


def main(argv: list[str] | None = None) -> Path:
    """Write the heat-map PNG and return its path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options, config_arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if not options.phrase.strip():
        raise SystemExit("The phrase is empty; pass the words to ground with --phrase.")
    if not Path(options.image).is_file():
        raise SystemExit(f"Image not found: {options.image}; pass a JPEG, PNG or DICOM file with --image.")
    if options.ckpt_path and not Path(options.ckpt_path).is_file():
        raise SystemExit(
            f"Checkpoint not found: {options.ckpt_path}; run the demo first (python train.py --config "
            "configs/demo.yaml) or leave out --ckpt_path to use the U-Net of the config."
        )
    if options.image_size is not None and (options.image_size <= 0 or options.image_size % 8 != 0):
        raise SystemExit(f"--image_size must be a positive multiple of 8, got {options.image_size}.")
    if not config_arguments:
        raise SystemExit(
            "No config given: add the model's config after the ground.py options, "
            "for example: -- --config configs/demo.yaml"
        )

    # Model and grounding settings from the config.
    cli = GroundingCLI(LatentDiffusionModule, parser_kwargs={"parser_mode": "omegaconf+"}, args=config_arguments, run=False)
    module: LatentDiffusionModule = cli.model
    if options.ckpt_path:
        checkpoint = torch.load(options.ckpt_path, map_location="cpu", weights_only=False)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    callbacks = [callback for callback in cli.trainer.callbacks if isinstance(callback, GroundingEvaluation)]
    evaluation = callbacks[0] if callbacks else GroundingEvaluation()

    # Image, in the training geometry.
    image_size = options.image_size or getattr(cli.datamodule.hparams, "image_size", 512)
    try:
        gray = read_grayscale(options.image)
    except (ImageDecodeError, FileNotFoundError) as error:
        raise SystemExit(f"Could not read the image {options.image}: {error}") from error
    pixel_values = to_model_input(gray, image_size)[None]

    # One engine pass, then the main map and the per-token maps.
    hidden_states, encoded = module.encode_text([options.phrase])
    uncond_states, _ = module.encode_text([""])
    latents = module.encode_images(pixel_values)
    engine_config = dataclasses.replace(evaluation.engine_config, bimodal_bias_merging=False)
    engine = GroundingEngine(module.ema_unet, module.noise_scheduler.config, engine_config)
    summary = engine.run(latents, hidden_states, uncond_states, None, [pair_seed_from_id(options.phrase)])[0]
    strategy = evaluation.settings.token_strategy
    selection = select_tokens(options.phrase, encoded.offsets[0], encoded.attention_mask[0].tolist(), strategy)
    if selection.fallback:
        log.warning("Token strategy %s fell back to all tokens: %s.", strategy.value, selection.fallback)
    main_map = upsample_map(maps.combined_map(summary, list(selection.positions)).cpu().numpy(), (image_size, image_size))

    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure = render_word_maps(pixel_values[0].numpy(), main_map, word_maps(summary, options.phrase, encoded))
    figure.save(output)
    np.save(output.with_suffix(".npy"), main_map)
    log.info(
        "Wrote %s (image, %s map of tokens %s, then one map per word token) and the map as %s",
        output,
        strategy.value,
        list(selection.words),
        output.with_suffix(".npy"),
    )
    return output


if __name__ == "__main__":
    main()
