"""Certify a test set with an input-specific sigma found by quasiconcave search (QCRS, Kung & Chen 2024).

Every row also carries the ordinary certificate at the fixed --sigma (fixed_* columns), so
`SRS/code/analyze.py OUT.tsv --compare-fixed` compares both on the same images.

    python SRS/code/certify_qcrs.py digits CKPT out/qcrs.tsv --sigma 0.25 --N 1000 --skip 10
    python SRS/code/certify_qcrs.py cifar10 CKPT out/qcrs_srs.tsv --sigma 0.5 --left 0.12 --right 1.7 \
        --epsilon 0.03 --epsilon_step 2 --gradient_n 500 --srs --f_thresh 3 --batch 400 --N 10000

Guarantee: predict/radius certify g_{best_sigma} at that input only (w.p. >= 1 - alpha); the
input-dependent classifier x -> g_{sigma(x)}(x) is NOT certified (see SRS/qcrs.py).  The
fixed_* columns are the ordinary certificate of the single classifier g_{sigma}.

--threads N: torch's CPU threads (default: OMP_NUM_THREADS, else usable cores / torchrun
local processes; oversubscription on a busy machine made certification ~50x slower).
"""
from DEQ.errors import cli_main
from SRS.cli import certify_qcrs_main, qcrs_parser


def parse_args(argv=None):
    return qcrs_parser().parse_args(argv)


@cli_main
def main(argv=None):
    s = certify_qcrs_main(parse_args(argv))
    if not s["main"]:
        return  # under torchrun rank 0 reports
    print(f"certified {s['images']} images ({s['skipped_done']} already in the file); all {s['rows']} rows of the file: "
          f"accuracy at radius 0 "
          f"{100 * s['accuracy']:.1f}%, ACR {s['acr']:.3f} (fixed sigma {s['fixed_acr']:.3f}), sigma moved on "
          f"{s['moved']}, search {s['mean_search_samples']:.0f} samples/image "
          f"(+{100 * s['search_overhead']:.1f}% over N0 + N), {s['seconds_per_image']:.2f} s/image")


if __name__ == "__main__":
    main()
