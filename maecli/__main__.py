from maecli.cli import app

app(prog_name="maecli")
