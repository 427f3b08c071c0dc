from aiagentchat.cli import main

main()
