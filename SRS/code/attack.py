"""Empirical robustness: attack every chosen image, then predict with the smoothed classifier there.

Certified accuracy at radius r lower-bounds accuracy under any attack of size r: the attack table must not fall
below the certified-accuracy table.  Examples: docs/certification.md.
"""
from DEQ.errors import cli_main
from SRS.cli import attack_main, attack_parser


def parse_args(argv=None):
    return attack_parser().parse_args(argv)


@cli_main
def main(argv=None):
    s = attack_main(parse_args(argv))
    if not s["main"]:
        return  # under torchrun rank 0 reports
    print(f"attacked {s['images']} images ({s['skipped_done']} already in the file); all {s['rows']} rows of the file: "
          f"smoothed accuracy under attack {100 * s['accuracy']:.1f}%, base model {100 * s['base_accuracy_adv']:.1f}%, "
          f"largest perturbation {s['max_adv_norm']:.4g}, {s['seconds_per_image']:.2f} s/image")


if __name__ == "__main__":
    main()
