"""diffusers <-> BFL names of the FLUX transformer: kubetune's mapping is diffusers' own
converter run backwards (real FLUX.1 sizes on the meta device; the tiny model's values)."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from runner.models.flux_keys import bfl_to_diffusers, diffusers_to_bfl
from runner.models.tiny_flux import tiny_transformer


def _flux1(num_layers: int, num_single_layers: int) -> FluxTransformer2DModel:
    with init_empty_weights():  # FLUX.1-dev's sizes, no memory
        return FluxTransformer2DModel(
            num_layers=num_layers, num_single_layers=num_single_layers, guidance_embeds=True
        )


def test_real_sized_names_and_shapes_match_diffusers_converter() -> None:
    state = _flux1(2, 2).state_dict()
    back = convert_flux_transformer_checkpoint_to_diffusers(diffusers_to_bfl(state))
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    again = bfl_to_diffusers(diffusers_to_bfl(state))
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in state.items()}


def test_tiny_values_match_diffusers_converter_and_round_trip() -> None:
    torch.manual_seed(0)
    state = tiny_transformer().state_dict()
    bfl = diffusers_to_bfl(state)
    assert {k: torch.equal(v, state[k]) for k, v in bfl_to_diffusers(bfl).items()} == {
        k: True for k in state
    }
    # diffusers splits single-block linear1 at FLUX.1's fixed 3072/12288: give it real-sized
    # (meta) single blocks and compare every other tensor by value.
    real = {k: v for k, v in diffusers_to_bfl(_flux1(0, 1).state_dict()).items() if "single" in k}
    mixed = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.")} | real
    theirs = convert_flux_transformer_checkpoint_to_diffusers(mixed)
    compared = [k for k in state if not k.startswith("single_transformer_blocks.")]
    assert len(compared) > 40
    assert all(torch.equal(theirs[k], state[k]) for k in compared)


def test_model_prefix_of_full_checkpoints_is_accepted() -> None:
    torch.manual_seed(0)
    state = tiny_transformer().state_dict()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(state).items()}
    assert set(bfl_to_diffusers(prefixed)) == set(state)
