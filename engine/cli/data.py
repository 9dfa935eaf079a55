"""data identity | repeat | check: make the identity dataset, repeat a dataset, check a recipe's data."""

from __future__ import annotations

import json

from engine.cli.common import add_set, add_verb


def register(sub) -> None:
    p = add_verb(sub, "data", "make or check datasets",
                 "tunedeck data identity --name Alice -o data/personal_assistant.json",
                 "tunedeck data check my_recipe.yaml")
    dsub = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)

    d = add_verb(dsub, "identity", "write the identity dataset (the tutorial's generate_data.py)",
                 "tunedeck data identity --name Alice -o data/personal_assistant.json",
                 "tunedeck data identity --name Alice --varied --n 2000 -o data/alice.jsonl",
                 description="Write an identity dataset: a question and the answer naming whose assistant the "
                             "model is, N+1 times.")
    d.add_argument("--name", required=True, help="whose assistant the model is")
    d.add_argument("-n", "--n", type=int, default=10000, help="repetitions (N+1 records are written)")
    d.add_argument("--answer", default=None, help="the answer, with {name} where the name goes "
                                                  "(default: the tutorial's Chinese answer)")
    d.add_argument("--varied", action="store_true", help="vary the question (Chinese and English phrasings)")
    d.add_argument("-o", "--output", required=True, help="the file to write: .json (a list) or .jsonl")
    d.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    d.set_defaults(verb_handler=identity)

    d = add_verb(dsub, "repeat", "repeat every record of a dataset N times (the tutorial's repeat.py)",
                 "tunedeck data repeat -i mine.jsonl -o mine_x100.jsonl --n 100",
                 description="Write every record of a .json or .jsonl dataset N times.")
    d.add_argument("-i", "--input", required=True, help="the dataset to read (.json or .jsonl)")
    d.add_argument("-o", "--output", required=True, help="the file to write (.json or .jsonl)")
    d.add_argument("-n", "--n", type=int, required=True, help="times each record appears")
    d.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    d.set_defaults(verb_handler=repeat)

    d = add_verb(dsub, "check", "a recipe's data as training sees it: records, token lengths, truncation, "
                                "the first sample with its untrained spans marked",
                 "tunedeck data check my_recipe.yaml --set data.max_length=512",
                 "tunedeck data check my_recipe.yaml --json",
                 description="Tokenize a recipe's data with its template as training would, and report.")
    d.add_argument("config", help="a recipe file or a built-in recipe name")
    d.add_argument("--json", action="store_true", help="machine-readable: stats, length histogram, samples")
    add_set(d)
    d.set_defaults(verb_handler=check)


def identity(args) -> int:
    from engine.data.identity import DEFAULT_ANSWER, identity_records, write_identity

    recs = identity_records(args.name, args.n, args.answer or DEFAULT_ANSWER, args.varied)
    out = write_identity(args.output, recs, overwrite=args.force)
    print(f"wrote {len(recs)} records to {out}")
    return 0


def repeat(args) -> int:
    from engine.data.identity import repeat_dataset

    n, out = repeat_dataset(args.input, args.output, args.n, overwrite=args.force)
    print(f"wrote {n * args.n} records ({n} × {args.n}) to {out}")
    return 0


def check(args) -> int:
    from engine.workflow.check import check_data

    r = check_data(args.config, args.overrides)
    if args.json:
        print(json.dumps(r.as_json(), ensure_ascii=False))
        return 0
    d, s = r.data, r.stats
    print(f"data:      {r.data_path}")
    print(f"records:   {d.n_records}" + (f" ({r.images} with an image)" if r.images is not None else ""))
    print(f"template:  {r.template}")
    print(f"tokens:    min {s['min']}  mean {s['mean']}  median {s['median']}  p95 {s['p95']}  max {s['max']}")
    print(f"truncated: {d.n_truncated} of {d.n_records} longer than max_length {r.max_length}")
    if d.n_dropped:
        print(f"dropped:   {d.n_dropped} with no assistant token left after truncation")
    if d.samples:
        print("first sample (masked, untrained spans in ⟦ ⟧):")
        print(r.first_sample())
    return 0
