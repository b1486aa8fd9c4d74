"""Evaluate the smoothed classifier's prediction (PREDICT, with abstention) on a test set.

    python SRS/code/predict.py digits CKPT 0.25 out/pred.tsv --N 1000 --skip 10 [--srs --f_thresh 1 ...]

--threads N: torch's CPU threads (default: OMP_NUM_THREADS, else usable cores / torchrun
local processes; oversubscription on a busy machine made certification ~50x slower).
"""
from DEQ.errors import cli_main
from SRS.cli import predict_main, predict_parser


def parse_args(argv=None):
    return predict_parser().parse_args(argv)


@cli_main
def main(argv=None):
    summary = predict_main(parse_args(argv))
    if not summary["main"]:
        return  # under torchrun rank 0 reports
    print(f"predicted {summary['images']} images ({summary['skipped_done']} already in the file); all "
          f"{summary['rows']} rows of the file: accuracy {100 * summary['accuracy']:.1f}%, "
          f"{summary['seconds_per_image']:.2f} s/image")


if __name__ == "__main__":
    main()
