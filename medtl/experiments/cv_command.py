"""`medtl cv run` and `medtl cv report`: by patient (medtl.experiments.cv) or by site (medtl.experiments.cv_sites)."""
from __future__ import annotations

from pathlib import Path

from medtl.experiments.cv import DEFAULT_OUT, cv_report, describe, run_folds
from medtl.experiments.cv_sites import describe_sites, run_sites, site_report


def register(subparsers) -> None:
    p = subparsers.add_parser("cv", help="cross-validation by patient as DVC experiments (docs/validation.md)",
                              description="Cross-validation by patient over train + val, the test split held out.")
    sub = p.add_subparsers(dest="cv_command", required=True)
    r = sub.add_parser("run", help="queue one DVC experiment per fold (or per held-out site) and start the queue")
    r.add_argument("--by", choices=("patient", "site"), default="patient",
                   help="patient: k folds by patient; site: leave one site out, one experiment per site")
    r.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    r.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (dvc queue start -j)")
    r.add_argument("--seed", type=int, default=0, help="the partition into folds (preprocess.cv.seed)")
    r.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="params override for every fold, as in dvc exp run -S")
    r.add_argument("--name", default=None, help="experiment name prefix (default: cv<folds>, or loso with --by site)")
    r.add_argument("--no-wait", dest="wait", action="store_false", help="return once the queue is started")
    r.set_defaults(func=_run_main)
    s = sub.add_parser("report", help="aggregate the fold experiments of a commit (default: this one)")
    s.add_argument("--by", choices=("patient", "site"), default="patient",
                   help="site: the leave-one-site-out experiments (medtl cv run --by site)")
    s.add_argument("--name", default=None, help="experiment name prefix (default: the only one found)")
    s.add_argument("--rev", default="HEAD",
                   help="the commit the folds were run on, when it is not the current one (default: %(default)s)")
    s.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    s.add_argument("--n-resamples", type=int, default=None, help="bootstrap resamples (default: evaluate.bootstrap)")
    s.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: evaluate.bootstrap)")
    s.set_defaults(func=_report_main)


def _run_main(args) -> int:
    if args.by == "site":
        names = run_sites(args.jobs, args.sets, args.name, args.wait)
        if args.wait:
            print(f"medtl cv: {len(names)} held-out site experiments done (dvc exp show); next: medtl cv report --by site")
        return 0
    names = run_folds(args.folds, args.jobs, args.seed, args.sets, args.name, args.wait)
    if args.wait:
        print(f"medtl cv: {len(names)} fold experiments done (dvc exp show); next: medtl cv report")
    return 0


def _report_main(args) -> int:
    if args.by == "site":
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("cv-site")
        summary = site_report(args.name, out, args.n_resamples, args.seed, rev=args.rev)
        print("\n".join(describe_sites(summary)))
        print(f"medtl cv: wrote {out}/summary.json, out_of_site_predictions.csv, sites.json, chart.html")
        return 0
    summary = cv_report(args.name, args.out, args.n_resamples, args.seed, rev=args.rev)
    print("\n".join(describe(summary)))
    print(f"medtl cv: wrote {args.out}/summary.json, oof_predictions.csv, folds.json, chart.html")
    return 0
