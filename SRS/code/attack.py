"""Empirical robustness: attack every chosen image, then predict with the smoothed classifier there.

    python SRS/code/attack.py digits CKPT 0.25 out/pgd_0.5.tsv --attack pgd --epsilon 0.5 --N 1000 --skip 10
    python SRS/code/attack.py digits CKPT 0.25 out/spgd4_0.5.tsv --attack smooth_pgd --num_noise_vec 4 \
        --epsilon 0.5 --steps 20 --N 1000 --skip 10

One TSV row per image in predict.py's format (idx label predict correct time ...) plus the
perturbation's norm and the base model's prediction at the attacked input; the attack settings
are in the header (checked on --resume).  ``SRS/code/analyze.py --attack-table FILES`` makes the
paper's attack table.  Certified accuracy at radius r is a lower bound on the accuracy under any
attack of size r: the attack table must not fall below the certified-accuracy table.
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
