"""Certify a test set with an input-specific sigma found by quasiconcave search (QCRS, Kung & Chen 2024).

Guarantee: predict/radius certify g_{best_sigma} at that input only (w.p. >= 1 - alpha); the input-dependent
classifier x -> g_{sigma(x)}(x) is NOT certified (SRS/qcrs.py).  The fixed_* columns are the ordinary
certificate of the single classifier g_{sigma}.  Examples: docs/certification.md.
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
