from kuiper_plugins import create_app

app = create_app()
