"""The `zoo` command line: parses flags and calls library functions, nothing else.

  zoo train  --config experiments/NAME.py[:key=value,...] --workdir DIR [--config.a.b=V ...]
  zoo sample --workdir DIR --num N --out grid.png [--sampler S --steps K --guidance G --label L --seed K]
  zoo sample --workdir DIR --prompt "a red star." [--negative-prompt "..."] --num N --out grid.png
  zoo sample --workdir DIR --control depth:HINT.png [--control seg:H.png@DIR2] [--control-scale S]
             [--prompt "..."]  (text ControlNets: one image per prompt, or --num of one)
  zoo sample --workdir DIR --mode inpaint --image IN.png --mask MASK.png  (--mode outpaint --pad P)
  zoo generate --workdir DIR (--prompts FILE | --from-dataset shapes:test) --num N --out OUTDIR
  zoo eval   --workdir DIR [--config.evals.NAME.KEY=V ...]  (e.g. another split, more samples)
  zoo latents --config experiments/NAME.py[:key=value,...] --out DIR [--split S ...]
  zoo index  --workdir DIR (--images IMGDIR | --dataset name[/config]:split) --out INDEX
  zoo search INDEX "a small red star." [-k 5] [--image PATH] [--json] [--out top.png]
  zoo ask    --workdir DIR --image IMG.png "how many red shapes are there?" [--decoding beam]
  zoo convert --from KIND --in PATH --out DIR [--config EXP.py[:args]] [--base DIR]
  zoo export --workdir DIR --out PATH [--format F] [--raw] [--lora]
  zoo models [--model NAME ...] [--flops] [--json OUT.json]
  zoo bench  [--families F,...] [--sizes bench,smoke] [--flax-python PY] [--markdown MD] (--help)
"""

import argparse
import json
import logging
import os
import sys


def _parser():
  parser = argparse.ArgumentParser(prog='zoo', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train (or resume) an experiment in a workdir')
  train.add_argument('--config', required=True, help='experiments/NAME.py[:key=value,...]')
  train.add_argument('--workdir', required=True)
  sample = sub.add_parser('sample', help='write a PNG grid of samples from a workdir')
  sample.add_argument('--workdir', required=True)
  sample.add_argument('--num', type=int, default=16)
  sample.add_argument('--out', default='samples.png')
  sample.add_argument('--sampler', default=None,
                      help='ddpm, ddim, dpmpp_2m, euler or heun (default: the experiment\'s)')
  sample.add_argument('--steps', type=int, default=None)
  sample.add_argument('--guidance', type=float, default=None)
  sample.add_argument('--label', type=int, action='append', default=None,
                      help='class id; repeat for several (default: all classes)')
  sample.add_argument('--prompt', action='append', default=None,
                      help='text-to-image models: a prompt; repeat for several (one row each)')
  sample.add_argument('--negative-prompt', default=None,
                      help="what guidance steers away from (default: the experiment's, usually '')")
  sample.add_argument('--seed', type=int, default=0)
  sample.add_argument('--lora', default=None,
                      help='a LoRA .safetensors file to merge into the run (zoo export --lora)')
  sample.add_argument('--upscale', type=int, default=4)
  sample.add_argument('--mode', choices=('sample', 'inpaint', 'outpaint'), default='sample',
                      help='inpaint: regenerate --image where --mask is white; outpaint: grow '
                           '--image by --pad pixels per side')
  sample.add_argument('--image', default=None, help='inpaint/outpaint: the known image (PNG)')
  sample.add_argument('--mask', default=None, help='inpaint: white = generate, black = keep')
  sample.add_argument('--pad', type=int, default=0, help='outpaint: new pixels per side')
  sample.add_argument('--method', choices=('repaint', 'blend', 'model'), default=None,
                      help='inpaint/outpaint: RePaint resampling (default) or blended diffusion '
                           'for any run; an inpainting-trained run uses its mask input (model)')
  sample.add_argument('--jump-length', type=int, default=10, help='RePaint: steps per jump')
  sample.add_argument('--jump-n-sample', type=int, default=10, help='RePaint: visits per jump')
  sample.add_argument('--control', action='append', default=None,
                      help='ControlNet runs: KIND:HINT.png (depth, seg, pose, edges), or '
                           'KIND:HINT.png@WORKDIR for another ControlNet run over the same base; '
                           'repeat to combine controls')
  sample.add_argument('--control-scale', type=float, action='append', default=None,
                      help='conditioning scale: once for all controls or once per --control')
  gen = sub.add_parser('generate', help='pre-generate N images into a resumable dataset directory '
                       '(PNG shards, manifest.jsonl, a TFDS copy)')
  gen.add_argument('--workdir', required=True)
  gen.add_argument('--out', required=True, help='the dataset directory (rerun to resume)')
  gen.add_argument('--num', type=int, required=True, help='how many images')
  gen.add_argument('--prompts', default=None, help='text runs: a file with one prompt per line')
  gen.add_argument('--from-dataset', default=None,
                   help='name[/config]:split whose labels (class runs) or first captions (text '
                        'runs) condition image i (record i mod size); class runs default to '
                        'class i mod K')
  gen.add_argument('--per-device-batch', type=int, default=8,
                   help='images per device and step (the batch is this times the devices)')
  gen.add_argument('--seed', type=int, default=0, help='image i draws from fold_in(seed, i)')
  gen.add_argument('--sampler', default=None, help="default: the experiment's")
  gen.add_argument('--steps', type=int, default=None)
  gen.add_argument('--guidance', type=float, default=None)
  gen.add_argument('--devices', type=int, default=None,
                   help="use this process's first N devices (default: all)")
  gen.add_argument('--shard-size', type=int, default=1000, help='images per shard directory')
  gen.add_argument('--queue-size', type=int, default=2, help='batches the device may run ahead')
  gen.add_argument('--host-threads', type=int, default=None,
                   help='threads encoding and writing PNGs (default: up to 8 cores)')
  gen.add_argument('--sync', action='store_true',
                   help='no host thread: sample, then write, one batch after another')
  gen.add_argument('--compile-cache', default=None,
                   help="JAX's persistent compilation cache (default ~/.cache/zoo/"
                        "jax_compilation_cache; '' turns it off)")
  gen.add_argument('--no-tfds', action='store_true', help='skip writing OUT/tfds at the end')
  ask = sub.add_parser('ask', help='answer questions about an image (or caption it) with a '
                       'vision-language run')
  ask.add_argument('--workdir', required=True)
  ask.add_argument('--image', required=True)
  ask.add_argument('questions', nargs='*', help='one or more questions (none: a captioning run)')
  ask.add_argument('--decoding', default='greedy', help='greedy or beam (task.beams beams)')
  ask.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  conv = sub.add_parser('convert', help='a public checkpoint (safetensors file or HF-style '
                        'folder) -> a zoo workdir at step 0')
  conv.add_argument('--from', dest='kind', required=True,
                    help='diffusers-vae, diffusers-unet, diffusers-controlnet, dit, clip, siglip '
                    'or diffusers-sd (a StableDiffusionPipeline folder -> a text_to_image run)')
  conv.add_argument('--in', dest='source', required=True,
                    help='a .safetensors file or a folder with config.json (no pickles)')
  conv.add_argument('--out', required=True, help='the workdir to write')
  conv.add_argument('--config', default=None,
                    help="the experiment the run is written as (default: the kind's shapes one)")
  conv.add_argument('--base', default=None, help='diffusers-controlnet: the base diffusion run')
  conv.add_argument('--num-heads', type=int, default=None,
                    help='dit (facebook format): heads of an unpublished size')
  export = sub.add_parser('export', help="a run's params as safetensors in the public naming")
  export.add_argument('--workdir', required=True)
  export.add_argument('--out', required=True, help='a folder (or a .safetensors file: DiT)')
  export.add_argument('--format', default=None,
                      help='dit: facebook (default) or diffusers; the rest have one')
  export.add_argument('--raw', action='store_true', help='the raw params, not the EMA')
  export.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  export.add_argument('--lora', action='store_true',
                      help="a LoRA run's adapters alone (OUT.safetensors), not the merged model")
  table = sub.add_parser('models', help='architectures, presets and experiment models with '
                         'parameter counts (and FLOPs per example)')
  table.add_argument('--flops', action='store_true',
                     help="add XLA's FLOPs per example (traces every model: ~2 minutes here)")
  table.add_argument('--json', default=None, help='also write the rows as JSON')
  table.add_argument('--model', action='append', default=None,
                     help='only this model (unet, dit, vae, ...); repeat for several')
  evaluate = sub.add_parser('eval', help='run the experiment\'s evaluators on the latest checkpoint')
  evaluate.add_argument('--workdir', required=True)
  latents = sub.add_parser('latents', help="encode a latent-diffusion experiment's dataset "
                           'once with its frozen VAE (a TFDS dataset in --out)')
  latents.add_argument('--config', required=True, help='experiments/NAME.py[:key=value,...]')
  latents.add_argument('--out', required=True, help='data_dir to write tfds:zoo_latents into')
  latents.add_argument('--split', action='append', default=None,
                       help='a split to encode; repeat for several (default: train and eval)')
  latents.add_argument('--batch-size', type=int, default=64)
  index = sub.add_parser('index', help="embed images with a dual encoder run into a search index")
  index.add_argument('--workdir', required=True, help='a contrastive (CLIP / SigLIP) run')
  source = index.add_mutually_exclusive_group(required=True)
  source.add_argument('--images', help='a directory of PNG / JPEG files (searched recursively)')
  source.add_argument('--dataset', help='name[/config]:split, e.g. shapes:test')
  index.add_argument('--out', required=True, help='the index directory to write')
  index.add_argument('--batch-size', type=int, default=64)
  index.add_argument('--no-ema', action='store_true', help='embed with the raw, not EMA, params')
  index.add_argument('--overwrite', action='store_true', help='replace an existing index')
  search = sub.add_parser('search', help='the best matches of a text or image in an index')
  search.add_argument('index', help='a directory written by `zoo index`')
  search.add_argument('query', nargs='?', default=None, help='the text to search for')
  search.add_argument('--image', default=None, help='search with this image instead of a text')
  search.add_argument('-k', type=int, default=5, help='how many results')
  search.add_argument('--json', action='store_true', help='print the results as JSON')
  search.add_argument('--out', default=None, help='also write a PNG contact sheet of the results')
  search.add_argument('--workdir', default=None, help="the run (default: the index's own)")
  sub.add_parser('bench', add_help=False, help='speed against the PyTorch / Flax references, '
                 'MFU, scaling, sampler overhead (`zoo bench --help`: zoo/bench/perf.py)')
  return parser


def main(argv=None, quiet_after_failure=False):
  """Entry point; returns a process exit code. `quiet_after_failure` (the console script): after
  reporting a failure (exit code 1), drop what the process still writes to its stderr (fd 2)."""
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['bench']:  # Its own flags (zoo/bench/perf.py).
    from zoo.bench import perf
    try:
      perf.main(argv[1:])
    except ValueError as e:
      print(f'zoo bench: error: {e}', file=sys.stderr)
      return 2
    return 0
  overrides = [a for a in argv if a.startswith('--config.')]
  args = _parser().parse_args([a for a in argv if not a.startswith('--config.')])
  # Our own progress at INFO; the libraries' (Orbax, absl) only when something is wrong.
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
  logging.getLogger('zoo').setLevel(logging.INFO)
  if overrides and args.command not in ('train', 'latents', 'convert', 'eval'):
    raise SystemExit('--config.* overrides apply to `zoo train`, `zoo latents`, `zoo convert` '
                     'and (config.evals.* only) `zoo eval`')
  # Imported after parsing: `zoo --help` should not wait for JAX.
  from zoo import config as zoo_config
  from zoo import runs
  from zoo import train
  try:
    if args.command == 'train':
      config = zoo_config.load(args.config, overrides)
      train.train_and_evaluate(config, args.workdir)
    elif args.command == 'sample' and args.control:
      if args.mode != 'sample':
        raise ValueError('--control samples a ControlNet run: no --mode')
      runs.control(args.workdir, args.out, [runs.parse_control(c) for c in args.control],
                   scales=args.control_scale or (), num=args.num, labels=args.label,
                   prompts=args.prompt, negative_prompt=args.negative_prompt,
                   sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, upscale=args.upscale)
      print(args.out)
    elif args.command == 'sample' and args.mode != 'sample':
      if args.image is None:
        raise ValueError(f'--mode {args.mode} needs --image IN.png')
      runs.inpaint(args.workdir, args.out, args.image, mask=args.mask, pad=args.pad,
                   mode=args.mode, num=args.num, labels=args.label, prompts=args.prompt,
                   negative_prompt=args.negative_prompt, method=args.method,
                   sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, upscale=args.upscale, jump_length=args.jump_length,
                   jump_n_sample=args.jump_n_sample)
      print(args.out)
    elif args.command == 'sample':
      if args.image or args.mask or args.pad:
        raise ValueError('--image, --mask and --pad need --mode inpaint or --mode outpaint')
      runs.sample(args.workdir, args.out, num=args.num, labels=args.label, sampler=args.sampler,
                  steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  upscale=args.upscale, prompts=args.prompt,
                  negative_prompt=args.negative_prompt, lora=args.lora)
      print(args.out)
    elif args.command == 'generate':
      from zoo.pipelines import generate
      prompts = generate.read_prompts(args.prompts) if args.prompts else None
      summary = generate.generate(
          args.workdir, args.out, num=args.num, prompts=prompts, dataset=args.from_dataset,
          per_device_batch=args.per_device_batch, seed=args.seed, sampler=args.sampler,
          steps=args.steps,
          guidance_scale=args.guidance, shard_size=args.shard_size, queue_size=args.queue_size,
          pipelined=not args.sync, compile_cache=args.compile_cache, devices=args.devices,
          write_tfds=not args.no_tfds, host_threads=args.host_threads)
      print(json.dumps(summary, indent=2))
    elif args.command == 'ask':
      from zoo.pipelines import ask
      answers = ask.ask(args.workdir, args.image, args.questions, decoding=args.decoding,
                        step=args.step)
      for question, answer in zip(args.questions or [''], answers):
        print(f'{question} -> {answer}' if question else answer)
    elif args.command in ('convert', 'export'):
      from zoo.convert import workdir as convert_workdir
      if args.command == 'convert':
        convert_workdir.convert(args.kind, args.source, args.out, experiment=args.config,
                                overrides=overrides, base=args.base, num_heads=args.num_heads)
        print(args.out)
      else:
        print('\n'.join(convert_workdir.export(args.workdir, args.out, fmt=args.format,
                                               use_ema=not args.raw, step=args.step,
                                               lora_only=args.lora)))
    elif args.command == 'models':
      from zoo.models import table
      rows = table.rows(flops=args.flops, names=tuple(args.model or ()))
      print(table.markdown(rows))
      if args.json:
        from zoo import files
        with files.atomic_open(args.json) as f:
          json.dump(rows, f, indent=2)
    elif args.command == 'latents':
      from zoo import latents
      builder = latents.precompute(zoo_config.load(args.config, overrides), args.out,
                                   splits=args.split or (), batch_size=args.batch_size)
      print(builder.data_dir)
    elif args.command == 'index':
      from zoo import search
      print(search.build_index(args.workdir, args.out, images=args.images, dataset=args.dataset,
                               batch_size=args.batch_size, use_ema=not args.no_ema,
                               overwrite=args.overwrite))
    elif args.command == 'search':
      from zoo import search
      results = search.search(args.index, text=args.query, image=args.image, k=args.k,
                              workdir=args.workdir)
      print(json.dumps(results, indent=2) if args.json else search.format_results(results))
      if args.out:
        search.contact_sheet(args.index, results, args.out)
    else:
      print(json.dumps(runs.evaluate(args.workdir, overrides=overrides), indent=2))
  except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
    print(f'zoo {args.command}: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # A full disk, unreadable checkpoints (checkpoint.CorruptCheckpoint).
    report = sys.stderr
    # Orbax leaves the failed write's sibling futures behind; asyncio would log each one with
    # its traceback ("exception was never retrieved") when they are collected, after this line.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    if quiet_after_failure:
      report = _silence_stderr()
    print(f'zoo {args.command}: failed: {e}', file=report, flush=True)
    return 1
  except FloatingPointError as e:
    print(f'zoo {args.command}: stopped: {e}', file=sys.stderr)
    return 3
  return 0


def _silence_stderr():
  """Sends file descriptor 2 to /dev/null from now on; returns a stream to the real stderr.

  After a failed save, Orbax's writer threads and TensorStore's callbacks into their closed
  event loops keep printing tracebacks ("Event loop is closed", absl's "_SignalingThread.run()
  raised an exception") until the process ends, some already halfway through a write: only
  the descriptor, not `sys.stderr`, catches them all.
  """
  sys.stderr.flush()
  report = os.fdopen(os.dup(2), 'w')
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  return report


def run():
  """Console-script entry point."""
  sys.exit(main(quiet_after_failure=True))


if __name__ == '__main__':
  run()
