"""Entry points (top layer): the ``sdtrain`` CLI and its subcommands, the demo's orchestration
(``demo.py``; its figures and report in ``demo_report.py``), the data commands, export / sample /
smoke glue and SLURM submission and status. Each command parses, builds a config and calls one
function of a lower layer; nothing below imports from here."""
