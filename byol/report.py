"""``python -m byol.report``: the results table of an evaluation sweep (code in byol.jobs.report)."""

from byol.jobs.report import main

if __name__ == "__main__":
    main()
