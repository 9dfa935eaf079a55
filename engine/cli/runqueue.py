"""queue: line runs up on a shared GPU box; a scheduler of its own starts each when its GPUs are free."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.cli.common import add_set, add_verb
from engine.core.constants import DEEPSPEED_CHOICES


def register(sub) -> None:
    p = add_verb(sub, "queue", "line runs up; each starts when its GPUs are free (one at a time without GPUs)",
                 "tunedeck queue add my_recipe.yaml --gpus 2", "tunedeck queue list", "tunedeck queue remove 3f2a1c",
                 "tunedeck queue pause",
                 description="A run queue for a shared GPU box. `queue add` starts the workspace's scheduler if it "
                             "is not running: a process of its own that survives the app and SSH closing and "
                             "starts the next run when its GPUs have no process on them (NVML).")
    verbs = p.add_subparsers(dest="queue_verb", metavar="ACTION", required=True)
    a = add_verb(verbs, "add", "queue a recipe: it trains when its GPUs are free",
                 "tunedeck queue add my_recipe.yaml", "tunedeck queue add my_recipe.yaml --gpus 2 --set lr=1e-4",
                 "tunedeck queue add my_recipe.yaml --devices 1,3")
    a.add_argument("config", help="a recipe file or a built-in recipe name")
    a.add_argument("--gpus", type=int, default=1, help="how many GPUs it needs")
    a.add_argument("--devices", help="exactly these GPUs, e.g. 0 or 1,3 (it waits until they are free)")
    a.add_argument("--deepspeed", metavar="CONFIG", help="train under DeepSpeed: " + " | ".join(DEEPSPEED_CHOICES[1:]))
    add_set(a)
    a.set_defaults(verb_handler=add)
    ls = add_verb(verbs, "list", "the queue's entries in order, with their state and run",
                  "tunedeck queue list", "tunedeck queue list --json")
    ls.add_argument("--json", action="store_true", help="machine-readable")
    ls.set_defaults(verb_handler=list_queue)
    rm = add_verb(verbs, "remove", "take a waiting or failed entry out of the queue", "tunedeck queue remove 3f2a1c")
    rm.add_argument("id", help="the entry's id (queue list shows it)")
    rm.set_defaults(verb_handler=remove)
    add_verb(verbs, "pause", "start nothing new from the queue (runs already training go on)",
             "tunedeck queue pause").set_defaults(verb_handler=pause)
    add_verb(verbs, "resume", "start queued runs again (and the scheduler, if it is not running)",
             "tunedeck queue resume").set_defaults(verb_handler=resume)


def add(args) -> int:
    from engine.train.launch import config_path
    from engine.workflow.queue import add as queue_add
    from engine.workflow.queue import check_entry, ensure_scheduler
    from engine.workflow.train import parse_devices

    config = str(config_path(args.config))            # checked now, not when its turn comes
    check_entry(Path.cwd(), config, args.overrides, args.deepspeed)
    entry = queue_add(Path.cwd(), config, overrides=args.overrides, gpus=args.gpus,
                      devices=parse_devices(args.devices), deepspeed=args.deepspeed)
    pid = ensure_scheduler(Path.cwd())
    print(f"queued {entry['id']}: {Path(config).name} ({entry['gpus']} GPU{'s' if entry['gpus'] != 1 else ''}); "
          f"scheduler pid {pid}")
    return 0


def list_queue(args) -> int:
    from engine.workflow.queue import read_queue, scheduler_pid

    q = read_queue(Path.cwd())
    if args.json:
        print(json.dumps(q | {"scheduler_pid": scheduler_pid(Path.cwd())}, ensure_ascii=False, indent=1))
        return 0
    pid = scheduler_pid(Path.cwd())
    print(f"queue {'paused' if q.get('paused') else 'running'}; scheduler "
          + (f"pid {pid}" if pid else "not running (queue add starts it)"))
    if not q["entries"]:
        print("no entries")
    for e in q["entries"]:
        age = time.strftime("%m-%d %H:%M", time.localtime(e["added"]))
        where = e.get("run") or e.get("error") or ""
        gpus = ",".join(map(str, e["devices"])) if e.get("devices") else str(e["gpus"])
        print(f"{e['id']}  {e['state']:<8} {Path(e['config']).name:<36} gpus {gpus:<5} {age}  {where}")
    return 0


def remove(args) -> int:
    from engine.workflow.queue import remove as queue_remove

    e = queue_remove(Path.cwd(), args.id)
    print(f"removed {e['id']}: {Path(e['config']).name}")
    return 0


def pause(args) -> int:
    from engine.workflow.queue import set_paused

    set_paused(Path.cwd(), True)
    print("queue paused: nothing new starts (running runs go on); tunedeck queue resume")
    return 0


def resume(args) -> int:
    from engine.workflow.queue import ensure_scheduler, set_paused

    set_paused(Path.cwd(), False)
    print(f"queue running; scheduler pid {ensure_scheduler(Path.cwd())}")
    return 0
