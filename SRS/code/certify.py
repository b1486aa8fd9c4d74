"""Certify a test set with randomized smoothing (standard) or SRS; one TSV row per image.

Both modes certify the checkpoint config's CERTIFY model (MDEQ-30A, tol 0, unless it says otherwise), named
on the line printed before the work.  Examples: docs/certification.md.
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
