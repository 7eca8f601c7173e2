"""A test-only model family, added the way a new family is added: this one module, no edits elsewhere.

``fake_sd1`` is an SD1.x variant with its own name, its own tiny architecture (a three-level UNet
with other widths than SD1's tiny one), its own latent scale and its own bucket multiple. It keeps
SD1's tokenizer, text encoder, checkpoint key layout and LoRA key layout, so SD1's trainer script
(train_network.py) and gen_img.py run it; sdtk tells its files apart from SD1's by the family name
it records in every file it saves.

Importing the module registers the family (tests/test_family_registry.py imports it in a fixture
and unregisters it afterwards, so no other test sees it).
"""

from __future__ import annotations

from library.models.families import Family, register
from library.models.families.sd1 import SD1


class FakeSD1(SD1):
    value = "fake_sd1"
    pretty = "FakeSD1 (test family)"
    base = Family.SD1
    latent_scale = 0.5  # the tiny VAE's scaling_factor; trainer and pipeline read it from there
    bucket_multiple = 64

    def tiny_unet_config(self) -> dict:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 48),
            cross_attention_dim=32,  # SD1's tiny text encoder width
            attention_head_dim=4,
        )


FAKE_SD1 = register(FakeSD1())
