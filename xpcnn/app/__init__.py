"""What people run: the command line and the programs behind its verbs.

    cli.py      ``xpcnn train | evaluate | predict | tune | serve``: options, exit codes,
                one-line errors
    predict.py  classifying picture and array files with a checkpoint
    report.py   ``evaluate --report``: confusion matrix, per-class scores, mistakes, feature maps
    tune.py     ``xpcnn tune``: the book's hyper-parameter search (6.5) on Optuna (an optional extra)
    serve.py    ``xpcnn serve``: the web page and HTTP API (FastAPI, uvicorn: an optional extra),
                its page in static/
    plots.py    the figures (matplotlib, written atomically)
"""
