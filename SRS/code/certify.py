"""Certify a test set with randomized smoothing (standard) or SRS; one TSV row per image.

    python SRS/code/certify.py digits CKPT 0.25 out/srs.tsv --srs --f_thresh 3 --N 10000 --skip 10   # the recipe
    python SRS/code/certify.py digits CKPT 0.25 out/std.tsv --N 10000 --skip 10   # standard randomized smoothing
    python SRS/code/certify.py cifar10 CKPT 0.5 out/srs.tsv --srs --f_solver anderson --f_thresh 3 \
        --warmup_solver anderson --warmup_thresh 10 --conf_drop 400 --batch 400 --N 10000 --skip 20
    python SRS/code/certify.py digits CKPT 0.25 out/seq.tsv --sequential --radii 0 0.25 0.5 --N 10000 --batch 1000

Both modes certify the checkpoint config's CERTIFY model (MDEQ-30A, tol 0, unless it says otherwise); the
line printed before the work names it.

--threads N sets torch's CPU threads (default: OMP_NUM_THREADS if set, else the usable
cores shared among torchrun's local processes): on a busy machine oversubscribed threads
made certification ~50x slower.
"""
from DEQ.errors import cli_main
from SRS.cli import certify_main, certify_parser


def parse_args(argv=None):
    return certify_parser().parse_args(argv)


@cli_main
def main(argv=None):
    summary = certify_main(parse_args(argv))
    if not summary["main"]:
        return  # under torchrun rank 0 reports
    print(f"certified {summary['images']} images ({summary['skipped_done']} already in the file); all {summary['rows']} "
          f"rows of the file: accuracy at radius 0 {100 * summary['accuracy']:.1f}%, {summary['seconds_per_image']:.2f} s/image")
    if "mean_samples" in summary:
        print(f"sequential: {summary['mean_samples']:.0f} noisy samples per image on average "
              f"({100 * summary['sample_fraction']:.1f}% of N0 + N)")


if __name__ == "__main__":
    main()
