"""``echolvfm vae-stats --vae PATH --data PREPARED``: measure a VAE's per-channel latent mean and sd on echoes.

The generator trains on normalised latents, so a VAE that was not trained here (e.g. a user's copy of a public
"4f4" echo VAE, grey or RGB) needs its latent statistics measured on the same kind of frames: the real ED / ES
frames of the training split plus frames of some prepared loops. By default they are written into ``PATH``'s
``config.json`` (``latents_mean`` / ``latents_std``; the weights are not touched); ``--out DIR`` instead saves a
complete copy of the VAE with the statistics to ``DIR``.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vae-stats", help="measure and save a VAE's latent mean / sd on a prepared data set")
    p.add_argument("--vae", required=True, metavar="PATH",
                   help="diffusers AutoencoderKL folder (or a folder with vae/)")
    p.add_argument("--data", required=True, metavar="PREPARED", help="folder written by `echolvfm prepare`")
    p.add_argument("--split", default="train", help="split whose frames are used (default: train)")
    p.add_argument("--loops", type=int, default=100, help="prepared loops whose frames join the real frames")
    p.add_argument("--frames-per-loop", type=int, default=6)
    p.add_argument("--out", default=None, metavar="DIR", help="save a copy with the stats here instead of editing PATH")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the loop choice")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from echolvfm_core.cli import CommandError
    from echolvfm_core.data.prepared import PreparedLoops
    from echolvfm_core.models.vae import (
        EchoCodec,
        compute_latent_stats,
        write_latent_stats,
    )
    from echolvfm_core.training.vae import loop_frames

    if args.loops < 0 or args.frames_per_loop < 1:
        raise CommandError("--loops must be >= 0 and --frames-per-loop >= 1.")
    try:
        codec = EchoCodec.from_pretrained(args.vae, device=args.device)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    data = PreparedLoops(args.data, split=args.split)
    real = data.real_frames().images
    loops = loop_frames(data, args.loops, args.frames_per_loop, seed=args.seed)
    if len(real) + len(loops) == 0:
        raise CommandError(f"{args.data} has no frames in split {args.split!r} to measure latent statistics on.")
    if (len(real) and real.shape[-1] % codec.downsample) or (len(loops) and loops.shape[-1] % codec.downsample):
        raise CommandError(f"The prepared frames' side is not divisible by the VAE's downsampling {codec.downsample}.")
    stats = compute_latent_stats(codec, [x for x in (real, loops) if len(x)])
    if args.out:
        codec.set_stats(stats)
        codec.save_pretrained(args.out)
        where = args.out
    else:
        where = str(write_latent_stats(args.vae, stats))
    print(f"VAE: {codec.image_channels}-channel, {codec.latent_channels} latent channels, "
          f"{codec.downsample}x downsampling")
    print(f"frames: {len(real)} real + {len(loops)} from loops ({args.split} split)")
    print("latents_mean: " + ", ".join(f"{v:.4f}" for v in stats.mean))
    print("latents_std:  " + ", ".join(f"{v:.4f}" for v in stats.std))
    print(f"written to {where}")
    return 0
