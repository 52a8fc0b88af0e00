"""diffusers config.json <-> zoo model kwargs, for `zoo convert` and `zoo export`.

Each reader takes the config dict `save_pretrained` writes and returns the kwargs of the zoo
module with the same parameters and numerics; a field zoo has no equivalent for (another
activation, another time embedding, SDXL's added conditions) raises ValueError naming it
rather than converting to a model that silently computes something else. The writers give the
config `from_pretrained` rebuilds the same module from (defaults left to diffusers).
"""

import math

from zoo.models import dit


def _fixed(cfg, where, **allowed):
  """Raises unless every `key` of `cfg` is absent or one of its allowed values."""
  for key, values in allowed.items():
    values = values if isinstance(values, tuple) else (values,)
    if key in cfg and cfg[key] not in values:
      raise ValueError(f'{where}: {key}={cfg[key]!r} is not supported by zoo '
                       f'(allowed: {", ".join(repr(v) for v in values)})')


def _same(value, key, where):
  """An int from a per-block list that must hold one value (zoo uses one for all blocks)."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f'{where}: per-block {key}={value!r} is not supported (one value only)')
    value = value[0]
  return value


# --- AutoencoderKL ---

def vae_kwargs(cfg):
  """zoo `vae.AutoencoderKL` kwargs from a diffusers `AutoencoderKL` config."""
  where = 'AutoencoderKL config'
  _fixed(cfg, where, act_fn='silu', force_upcast=(True, False),
         mid_block_add_attention=(True, False))
  levels = len(cfg['block_out_channels'])
  for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                     ('up_block_types', 'UpDecoderBlock2D')):
    if tuple(cfg.get(key, (block,) * levels)) != (block,) * levels:
      raise ValueError(f'{where}: {key}={cfg[key]!r}; zoo supports only {block}')
  quant = cfg.get('use_quant_conv', True)
  if cfg.get('use_post_quant_conv', True) != quant:
    raise ValueError(f'{where}: use_quant_conv and use_post_quant_conv must agree')
  return dict(in_channels=cfg.get('in_channels', 3), out_channels=cfg.get('out_channels', 3),
              block_out_channels=tuple(cfg['block_out_channels']),
              layers_per_block=cfg.get('layers_per_block', 1),
              latent_channels=cfg.get('latent_channels', 4),
              norm_num_groups=cfg.get('norm_num_groups', 32),
              mid_block_attention=cfg.get('mid_block_add_attention', True), use_quant_conv=quant,
              scaling_factor=float(cfg.get('scaling_factor') or 0.18215),
              shift_factor=float(cfg.get('shift_factor') or 0.0))


def vae_config(kw):
  levels = len(kw['block_out_channels'])
  return {'_class_name': 'AutoencoderKL', 'in_channels': kw['in_channels'],
          'out_channels': kw['out_channels'], 'block_out_channels': list(kw['block_out_channels']),
          'down_block_types': ['DownEncoderBlock2D'] * levels,
          'up_block_types': ['UpDecoderBlock2D'] * levels,
          'layers_per_block': kw['layers_per_block'], 'latent_channels': kw['latent_channels'],
          'norm_num_groups': kw['norm_num_groups'], 'act_fn': 'silu',
          'use_quant_conv': kw['use_quant_conv'], 'use_post_quant_conv': kw['use_quant_conv'],
          'mid_block_add_attention': kw['mid_block_attention'],
          'scaling_factor': kw['scaling_factor'], 'shift_factor': kw['shift_factor'] or None}


# --- UNet2DModel / UNet2DConditionModel / ControlNetModel ---

_UNET_FIXED = dict(act_fn='silu', resnet_time_scale_shift='default', class_embed_type=None,
                   addition_embed_type=None, encoder_hid_dim=None, time_cond_proj_dim=None,
                   only_cross_attention=False, dual_cross_attention=False, conv_in_kernel=3,
                   conv_out_kernel=3, time_embedding_type='positional', center_input_sample=False,
                   time_embedding_dim=None, mid_block_scale_factor=1, attention_type='default',
                   downsample_type='conv', upsample_type='conv', attn_norm_num_groups=None,
                   cross_attention_norm=None, timestep_post_act=None, num_train_timesteps=None,
                   projection_class_embeddings_input_dim=None,
                   controlnet_conditioning_channel_order='rgb',
                   global_pool_conditions=False, class_embeddings_concat=False,
                   encoder_hid_dim_type=None, reverse_transformer_layers_per_block=None)


def unet_kwargs(cfg, where='UNet config'):
  """zoo `unet.UNet` kwargs from a diffusers UNet2DModel / UNet2DConditionModel config."""
  _fixed(cfg, where, **_UNET_FIXED)
  conditional = cfg.get('_class_name', 'UNet2DConditionModel') != 'UNet2DModel'
  classes = cfg.get('num_class_embeds') or 0
  kw = dict(in_channels=cfg.get('in_channels', 4), out_channels=cfg.get('out_channels', 4),
            block_out_channels=tuple(cfg['block_out_channels']),
            layers_per_block=_same(cfg.get('layers_per_block', 2), 'layers_per_block', where),
            norm_num_groups=cfg.get('norm_num_groups', 32),
            norm_eps=float(cfg.get('norm_eps', 1e-5)),
            flip_sin_to_cos=cfg.get('flip_sin_to_cos', True),
            freq_shift=float(cfg.get('freq_shift', 0)),
            downsample_padding=cfg.get('downsample_padding', 1),
            # diffusers' table has a row per class id; zoo's last row is the null class.
            num_classes=max(classes - 1, 0))
  if 'down_block_types' in cfg:
    kw['down_block_types'] = tuple(cfg['down_block_types'])
  if 'up_block_types' in cfg:
    kw['up_block_types'] = tuple(cfg['up_block_types'])
  elif 'down_block_types' in cfg:  # A ControlNet: the up path is the base's, not stored.
    kw['up_block_types'] = tuple(_up_of(t) for t in reversed(cfg['down_block_types']))
  if not conditional:
    kw['attention_head_dim'] = cfg.get('attention_head_dim', 8)
    kw['mid_block_attention'] = cfg.get('add_attention', True)
    kw['mid_block_type'] = cfg.get('mid_block_type') or 'UNetMidBlock2D'
    return kw
  heads = cfg.get('num_attention_heads') or cfg.get('attention_head_dim', 8)  # the SD1 quirk
  kw |= dict(context_dim=_same(cfg.get('cross_attention_dim', 1280), 'cross_attention_dim', where),
             num_attention_heads=_same(heads, 'num_attention_heads', where),
             transformer_layers_per_block=_same(cfg.get('transformer_layers_per_block', 1),
                                                'transformer_layers_per_block', where),
             use_linear_projection=cfg.get('use_linear_projection', False),
             mid_block_type=cfg.get('mid_block_type') or 'UNetMidBlock2DCrossAttn')
  if kw['mid_block_type'] not in ('UNetMidBlock2DCrossAttn', 'UNetMidBlock2D'):
    raise ValueError(f'{where}: mid_block_type={kw["mid_block_type"]!r} is not supported')
  if kw['mid_block_type'] == 'UNetMidBlock2D':  # diffusers' get_mid_block: one resnet.
    kw |= dict(mid_block_layers=0, mid_block_attention=False)
  return kw


def _up_of(down_type):
  return down_type.replace('Down', 'Up')


def unet_config(kw):
  """The diffusers config of a zoo UNet: UNet2DConditionModel with a context, else UNet2DModel."""
  common = {'in_channels': kw['in_channels'], 'out_channels': kw['out_channels'],
            'block_out_channels': list(kw['block_out_channels']),
            'layers_per_block': kw['layers_per_block'],
            'down_block_types': list(kw['down_block_types']),
            'up_block_types': list(kw['up_block_types']),
            'norm_num_groups': kw['norm_num_groups'], 'norm_eps': kw['norm_eps'],
            'flip_sin_to_cos': kw['flip_sin_to_cos'], 'freq_shift': _int_if_whole(kw['freq_shift']),
            'downsample_padding': kw['downsample_padding'],
            'num_class_embeds': kw['num_classes'] + 1 if kw['num_classes'] else None}
  layers = kw.get('mid_block_layers', 1)
  if not kw.get('context_dim'):
    if layers != 1:
      raise ValueError(f'mid_block_layers={layers}: a diffusers UNet2DModel mid block has 1')
    return {'_class_name': 'UNet2DModel', **common, 'attention_head_dim': kw['attention_head_dim'],
            'add_attention': kw['mid_block_attention'], 'mid_block_type': kw['mid_block_type']}
  if layers != (0 if kw['mid_block_type'] == 'UNetMidBlock2D' else 1):
    raise ValueError(f"mid_block_layers={layers} with mid_block_type={kw['mid_block_type']!r} has "
                     'no UNet2DConditionModel equivalent (UNetMidBlock2D: 0, CrossAttn: 1)')
  return {'_class_name': 'UNet2DConditionModel', **common,
          'cross_attention_dim': kw['context_dim'],
          'attention_head_dim': kw['num_attention_heads'],
          'transformer_layers_per_block': kw['transformer_layers_per_block'],
          'use_linear_projection': kw['use_linear_projection'],
          'mid_block_type': kw['mid_block_type']}


def controlnet_extra(cfg):
  """The ControlNet-only fields of a diffusers `ControlNetModel` config."""
  return dict(conditioning_channels=cfg.get('conditioning_channels', 3),
              conditioning_embedding_out_channels=tuple(
                  cfg.get('conditioning_embedding_out_channels', (16, 32, 96, 256))))


def controlnet_config(kw):
  if kw['mid_block_type'] == 'UNetMidBlock2D' and kw.get('mid_block_layers', 1) != 0:
    raise ValueError("a diffusers ControlNetModel's UNetMidBlock2D is one resnet "
                     f"(mid_block_layers=0); this one has {kw.get('mid_block_layers', 1)}")
  cfg = unet_config(kw if kw.get('context_dim') else {**kw, 'mid_block_layers': 1})
  if cfg['_class_name'] != 'UNet2DConditionModel':  # Cross-attention width unused: no blocks.
    cfg = {**cfg, 'cross_attention_dim': 1280}
  cfg = {k: v for k, v in cfg.items() if k not in ('up_block_types', 'out_channels',
                                                   'add_attention')}
  return {**cfg, '_class_name': 'ControlNetModel',
          'conditioning_channels': kw['conditioning_channels'],
          'conditioning_embedding_out_channels': list(kw['conditioning_embedding_out_channels'])}


def _int_if_whole(x):
  return int(x) if float(x).is_integer() else x


# --- DiT ---

def dit_kwargs(cfg):
  """zoo `dit.DiT` kwargs from a diffusers `DiTTransformer2DModel` config (freq_shift 1)."""
  where = 'DiTTransformer2DModel config'
  _fixed(cfg, where, norm_type='ada_norm_zero', activation_fn='gelu-approximate',
         attention_bias=True, norm_elementwise_affine=False)
  heads, head_dim = cfg.get('num_attention_heads', 16), cfg.get('attention_head_dim', 72)
  channels = cfg.get('in_channels', 4)
  out = cfg.get('out_channels') or channels
  if out not in (channels, 2 * channels):
    raise ValueError(f'{where}: out_channels={out} must be in_channels ({channels}) or twice it')
  return dict(input_size=cfg.get('sample_size', 32), patch_size=cfg.get('patch_size', 2),
              in_channels=channels, hidden_size=heads * head_dim,
              depth=cfg.get('num_layers', 28), num_heads=heads, mlp_ratio=4.0,
              num_classes=cfg.get('num_embeds_ada_norm') or 1000, learn_sigma=out == 2 * channels,
              freq_shift=1.0, norm_eps=float(cfg.get('norm_eps', 1e-6)))


def dit_config(kw):
  if kw['freq_shift'] != 1.0 or kw['mlp_ratio'] != 4.0 or kw['context_dim'] or kw['pooled_dim']:
    raise ValueError('only a class-conditional DiT with freq_shift=1.0 and mlp_ratio=4 has a '
                     'diffusers DiTTransformer2DModel equivalent; export it as facebook')
  return {'_class_name': 'DiTTransformer2DModel', 'num_attention_heads': kw['num_heads'],
          'attention_head_dim': kw['hidden_size'] // kw['num_heads'],
          'in_channels': kw['in_channels'],
          'out_channels': kw['in_channels'] * (2 if kw['learn_sigma'] else 1),
          'num_layers': kw['depth'], 'sample_size': kw['input_size'],
          'patch_size': kw['patch_size'], 'num_embeds_ada_norm': kw['num_classes'],
          'norm_eps': kw['norm_eps']}


def dit_kwargs_from_facebook(state_dict, num_heads=None):
  """DiT kwargs read off a facebookresearch/DiT state dict's shapes (heads: by size or given)."""
  def shape(key):
    if key not in state_dict:
      raise ValueError(f'not a facebookresearch/DiT state dict: no {key!r}')
    return state_dict[key].shape
  hidden, channels, patch, _ = shape('x_embedder.proj.weight')
  depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
  if num_heads is None:
    known = {(d, h): n for d, h, n in dit.SIZES.values()}
    if (depth, hidden) not in known:
      raise ValueError(f'DiT of depth {depth}, width {hidden} is not a published size; pass '
                       'the head count (zoo convert --num-heads N)')
    num_heads = known[depth, hidden]
  kw = dict(input_size=int(math.isqrt(shape('pos_embed')[1])) * patch, patch_size=patch,
            in_channels=channels, hidden_size=hidden, depth=depth, num_heads=num_heads,
            mlp_ratio=shape('blocks.0.mlp.fc1.weight')[0] / hidden,
            learn_sigma=shape('final_layer.linear.weight')[0] == 2 * patch * patch * channels,
            num_classes=0, freq_shift=0.0)
  if 'y_embedder.embedding_table.weight' in state_dict:
    kw['num_classes'] = shape('y_embedder.embedding_table.weight')[0] - 1
  return kw
