from medflow.cli import app

app(prog_name="medflow")
