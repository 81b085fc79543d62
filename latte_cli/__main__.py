from latte_cli.cli import app

app(prog_name="latte")
