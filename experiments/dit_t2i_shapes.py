r"""Latent text-to-image DiT on the shapes scenes (64x64 RGB): experiments/ldm_t2i_shapes.py with
a DiT denoiser (2x2 patches of the VAE's 16x16x4 latents, cross-attention to the caption
tokens in every block, the pooled caption added to the timestep embedding in adaLN).

  zoo train --config experiments/vae_shapes.py --workdir workdirs/vae_shapes
  zoo train --config experiments/dit_t2i_shapes.py --workdir workdirs/dit_t2i_shapes
  zoo sample --workdir workdirs/dit_t2i_shapes --prompt "one shape: a red circle." --num 8 \
      --out dit_t2i.png
  zoo train --config experiments/dit_t2i_shapes.py:smoke=True,vae=/tmp/vae_smoke \
      --workdir /tmp/dit_t2i_smoke

Arguments: as experiments/ldm_t2i_shapes.py (smoke, steps, vae, latents).
"""


from zoo import config as zoo_config


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, steps=0, vae='workdirs/vae_shapes', latents='')
  return zoo_config.sibling(__file__, 'ldm_t2i_shapes').get_config(f'smoke={arg.smoke},steps={arg.steps},vae={arg.vae},model=dit,'
                           f'latents={arg.latents}')
