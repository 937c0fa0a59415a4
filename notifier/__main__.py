from notifier.cli import run

run()
