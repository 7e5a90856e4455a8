"""Write official_parser_defaults.json: the default of every flag of the official scripts' parsers.

    cd tests/assets && python official_parser_defaults.py MAE_CHECKOUT MIXMIM_CHECKOUT > official_parser_defaults.json

Reads each ``get_args_parser()`` with ``ast`` (the official code is not imported or run): ``add_argument`` defaults
(``store_true`` False, ``store_false`` True, else None) and ``set_defaults``, keyed by ``dest``.
"""

import ast
import json
import subprocess
import sys

SCRIPTS = ("main_pretrain.py", "main_finetune.py", "main_linprobe.py")


def parser_defaults(source: str) -> dict:
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
    calls = sorted(
        (n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    out: dict = {}
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        if call.func.attr == "add_argument":
            flag = next(a.value for a in call.args if isinstance(a, ast.Constant) and a.value.startswith("--"))
            dest = ast.literal_eval(kw["dest"]) if "dest" in kw else flag[2:].replace("-", "_")
            action = ast.literal_eval(kw["action"]) if "action" in kw else None
            if "default" in kw:
                value = ast.literal_eval(kw["default"])
            else:
                value = {"store_true": False, "store_false": True}.get(action)
            if action == "store_false" and "dest" in kw and dest in out:
                continue  # --cls_token / --no_pin_mem: the flag's own dest keeps its default
            out[dest] = value
        elif call.func.attr == "set_defaults":
            out.update({k: ast.literal_eval(v) for k, v in kw.items()})
    return out


def main() -> None:
    result = {}
    for family, checkout in zip(("mae", "mixmim"), sys.argv[1:3], strict=True):
        for script in SCRIPTS:
            show = subprocess.run(["git", "-C", checkout, "show", f"HEAD:{script}"], capture_output=True, text=True)
            if show.returncode == 0:
                result[f"{family}/{script}"] = parser_defaults(show.stdout)
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
